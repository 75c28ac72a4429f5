#!/usr/bin/env python3
"""Where the CPU goes per packet: reads folded stacks (`inferno-collapse-perf` output of a
system-wide `perf record -a -g` taken while one load ran through fwnode) and attributes every
sample to one stage of the datapath, by the innermost frame that names a stage.

usage: perf-stages.py FOLDED SECONDS CPUS PACKETS [TITLE]
prints two Markdown tables (all CPUs, then fwnode's worker threads `queue-*` only): stage, share of
the samples, microseconds of CPU per packet. `perf record -e cpu-clock` samples weigh their period
in ns, so the microseconds come from the weights themselves.
"""
import sys

# (stage, substrings of a frame), most specific first; a sample goes to the first stage whose
# pattern matches its innermost matching frame.
STAGES = [
    ("fwnode: parse", ["fwnode::packet::"]),
    ("fwnode: track", ["fwnode::conntrack::"]),
    ("fwnode: policy", ["fwnode::policy::"]),
    ("fwnode: FTP helper", ["fwnode::helper::"]),
    ("fwnode: events / replication", ["fwnode::sync::"]),
    ("kernel: forwarding and the hosts' own TCP/UDP/IP (kernel forwarding does this too)",
     ["ip_forward", "ip6_forward", "ip_output", "ip6_output", "dev_queue_xmit", "veth_xmit",
      "__netif_receive_skb", "net_rx_action", "tcp_v4_rcv", "tcp_v6_rcv", "udp_rcv", "udpv6_rcv",
      "ip_rcv", "ipv6_rcv", "br_handle_frame", "tcp_sendmsg", "udp_sendmsg", "tcp_recvmsg",
      "udp_recvmsg", "__sys_connect", "__sys_accept4", "tcp_close", "inet_release"]),
    ("kernel: verdict + reinjection",
     ["nfqnl_recv_verdict", "nf_reinject", "nfqnl_reinject"]),
    ("kernel: queueing (build + copy the netlink message)",
     ["nfqnl_enqueue_packet", "__nfqnl_enqueue", "nfqnl_build_packet_message", "nf_queue"]),
    ("kernel: receive syscall (netlink to fwnode)", ["netlink_recvmsg", "__sys_recvfrom", "__x64_sys_recvfrom"]),
    ("kernel: verdict syscall (sendto)", ["netlink_sendmsg", "__sys_sendto", "__x64_sys_sendto"]),
    ("fwnode: the worker loop (parse, track and policy where inlined into it, verdict building)",
     ["fwnode::datapath::"]),
]
PATH_STAGES = len(STAGES)


def stage_of(frames):
    for f in reversed(frames):
        for name, pats in STAGES:
            if any(p in f for p in pats):
                return name
    comm = frames[0] if frames else "?"
    if comm.startswith(("fwnode", "queue-", "sync")):
        return "fwnode's threads: other (allocator, std, kernel work in their context)"
    if comm.startswith(("connrate", "iperf3", "python")):
        return "load generator: client and server processes and their TCP/IP"
    if comm.startswith(("ksoftirqd", "kworker")):
        return "kernel threads: softirq forwarding, workers"
    if comm.startswith("swapper"):
        return "idle"
    return "unrelated processes (whatever else ran on the machine)"


def table(rows, title, packets, order, cpu_ns=None):
    all_ = sum(rows.values())
    print(f"| {title}: stage | share of samples | µs of CPU per packet |")
    print("|---|---:|---:|")
    path = 0.0
    for i, name in enumerate(order):
        if name in rows:
            share = rows[name] / all_
            us = rows[name] / 1e3 / packets
            if i < PATH_STAGES and not name.startswith("kernel: forwarding"):
                path += us
            print(f"| {name} | {share * 100:.1f} % | {us:.2f} |")
    print(f"| **what NFQUEUE and fwnode add per packet (the stages above, less forwarding)** | | **{path:.2f}** |")
    total = f"{all_ / 1e9:.1f} s of CPU"
    if cpu_ns:
        total += f" of {cpu_ns / 1e9:.0f} s ({all_ / cpu_ns * 100:.0f} %)"
    print(f"| all ({total}, {packets} packets through fwnode) | 100 % | {all_ / 1e3 / packets:.2f} |")
    print()


def main():
    folded, seconds, cpus, packets = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    title = sys.argv[5] if len(sys.argv) > 5 else folded
    every, worker = {}, {}
    for line in open(folded):
        stack, _, n = line.rstrip("\n").rpartition(" ")
        if not n.isdigit():
            continue
        frames = stack.split(";")
        s = stage_of(frames)
        every[s] = every.get(s, 0) + int(n)
        if frames[0].startswith("queue-"):
            worker[s] = worker.get(s, 0) + int(n)
    if not every or not packets:
        sys.exit(f"{folded}: no samples or no packets")
    order = [n for n, _ in STAGES] + [
        "fwnode's threads: other (allocator, std, kernel work in their context)",
        "load generator: client and server processes and their TCP/IP",
        "kernel threads: softirq forwarding, workers",
        "idle",
        "unrelated processes (whatever else ran on the machine)",
    ]
    table(every, f"{title}, all CPUs", packets, order, seconds * cpus * 1e9)
    if worker:
        table(worker, f"{title}, fwnode's worker threads only", packets, order, seconds * 1e9)


main()
