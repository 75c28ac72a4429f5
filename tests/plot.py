#!/usr/bin/env python3
"""Pictures of keepstate's measurements as SVG, with the standard library only.

  python3 tests/plot.py ratios   DATAPATH.json OUT.svg   # bench-datapath.sh results (KEEPSTATE_BENCH_OUT)
  python3 tests/plot.py failover FAILOVER.json OUT.svg   # failover (a) intervals (KEEPSTATE_PLOT_DIR)
  python3 tests/plot.py selftest                          # redraw docs/*.svg from docs/data/ and check them

The output is deterministic: the same data gives the same bytes, so `selftest` can check that the
pictures committed under docs/ are the ones their committed data makes. tests/tests/docs.rs runs
`selftest` so this script cannot rot.
"""

import json
import os
import sys
import tempfile
import xml.etree.ElementTree as ET
from xml.sax.saxutils import escape

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
# The pictures the README shows and the data each is drawn from.
COMMITTED = [
    ("ratios", "docs/data/datapath.json", "docs/datapath-ratios.svg"),
    ("failover", "docs/data/failover-a.json", "docs/failover-a.svg"),
    ("failover", "docs/data/failover-a-0-02-s-adverts.json", "docs/failover-a-20ms-adverts.svg"),
]

FONT = 'font-family="DejaVu Sans, Arial, sans-serif"'
COLORS = ["#2b6cb0", "#68a4e0", "#d08a2e"]


def num(v):
    """A coordinate with at most two decimals, without trailing zeros (stable output)."""
    s = f"{v:.2f}".rstrip("0").rstrip(".")
    return "0" if s == "-0" else s


def text(x, y, s, size=12, anchor="start", extra=""):
    return (f'<text x="{num(x)}" y="{num(y)}" font-size="{size}" text-anchor="{anchor}" {FONT}{extra}>'
            f"{escape(s)}</text>")


def svg(width, height, body):
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}">\n<rect width="{width}" height="{height}" fill="white"/>\n'
            + "\n".join(body) + "\n</svg>\n")


# ---------------------------------------------------------------------------------------------
# ratios: fwnode against three baselines, as grouped bars

SETUPS = [
    ("fwnode, 1 queue", "best-case NFQUEUE loop, 1 queue"),
    ("fwnode, 2 queues", "best-case NFQUEUE loop, 2 queues"),
    ("fwnode, 1 queue, replicating to a standby", "best-case NFQUEUE loop, 1 queue"),
]
METRICS = [("tcp_gbps", "TCP Gbit/s"), ("udp_pps", "UDP 64 B pkt/s"), ("conn_per_s", "new TCP conn/s")]


def baselines(setups, fw_name, best_name):
    """The three baselines of one fwnode setup, per metric: kernel stateful; the one-verdict
    NFQUEUE loop (with GSO for TCP, as bench-datapath.sh compares, without for UDP and conn/s);
    the best-case NFQUEUE loop with the same queue count."""
    one = {"tcp_gbps": setups["accept-all NFQUEUE, GSO"]}
    for m in ("udp_pps", "conn_per_s"):
        one[m] = setups["accept-all NFQUEUE, no GSO"]
    return [
        ("kernel iptables stateful", {m: setups["kernel iptables stateful"] for m, _ in METRICS}),
        ("one-verdict-per-packet NFQUEUE loop", one),
        ("best-case loop (same queue count)", {m: setups[best_name] for m, _ in METRICS}),
    ]


def ratios_svg(data):
    setups = {s["name"]: s for s in data["setups"]}
    panels = []  # (baseline title, [(metric label, [ratio per setup])])
    for i, (base_title, _) in enumerate(baselines(setups, *SETUPS[0])):
        groups = []
        for m, label in METRICS:
            vals = []
            for fw, best in SETUPS:
                b = baselines(setups, fw, best)[i][1][m][m]
                vals.append(setups[fw][m] / b if b else 0.0)
            groups.append((label, vals))
        panels.append((base_title, groups))

    top = max(max(v for _, g in panels for _, vs in g for v in vs), 1.0)
    ymax = max(1.25, int(top * 4 + 1) / 4)
    W, H = 960, 420
    pw, ph, x0, y0 = 270, 260, 60, 70  # panel width/height, left margin, top of the plot area
    gap = 30
    body = [text(W / 2, 26, "fwnode as a ratio of each baseline, one run (" + data.get("source", data.get("date", "")) + ")",
                 15, "middle", ' font-weight="bold"')]
    for p, (title, groups) in enumerate(panels):
        px = x0 + p * (pw + gap)
        y = lambda v: y0 + ph - v / ymax * ph  # noqa: E731
        body.append(text(px + pw / 2, y0 - 14, "vs " + title, 13, "middle"))
        body.append(f'<rect x="{num(px)}" y="{y0}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>')
        t = 0.0
        while t <= ymax + 1e-9:
            body.append(f'<line x1="{num(px)}" y1="{num(y(t))}" x2="{num(px + pw)}" y2="{num(y(t))}" '
                        f'stroke="#eee"/>')
            if p == 0:
                body.append(text(px - 6, y(t) + 4, f"{t:.2f}×", 11, "end"))
            t += 0.25
        body.append(f'<line class="parity" x1="{num(px)}" y1="{num(y(1))}" x2="{num(px + pw)}" '
                    f'y2="{num(y(1))}" stroke="#c53030" stroke-dasharray="5,3"/>')
        gw = pw / len(groups)
        bw = (gw - 20) / len(SETUPS)
        for g, (label, vals) in enumerate(groups):
            gx = px + g * gw + 10
            for k, v in enumerate(vals):
                bx = gx + k * bw
                body.append(f'<rect class="bar" x="{num(bx + 1)}" y="{num(y(v))}" width="{num(bw - 2)}" '
                            f'height="{num(y0 + ph - y(v))}" fill="{COLORS[k]}"><title>{escape(SETUPS[k][0])}, '
                            f'{escape(label)}: {v:.2f}×</title></rect>')
                body.append(text(bx + bw / 2, y(v) - 3, f"{v:.2f}", 9, "middle"))
            body.append(text(gx + (gw - 20) / 2, y0 + ph + 16, label, 11, "middle"))
    ly = H - 40
    for k, (fw, _) in enumerate(SETUPS):
        lx = x0 + k * 300
        body.append(f'<rect x="{lx}" y="{ly - 10}" width="12" height="12" fill="{COLORS[k]}"/>')
        body.append(text(lx + 18, ly, fw, 12))
    body.append(text(x0, H - 12, "dashed: parity (1×). One-verdict loop: with GSO for TCP, without for UDP "
                     "and conn/s, as bench-datapath.sh compares.", 11))
    return svg(W, H, body)


# ---------------------------------------------------------------------------------------------
# failover: throughput over time across a crash of the active gateway

def failover_svg(data):
    iv = data["intervals"]
    pts = [((a + b) / 2, n * 8 / (b - a) / 1e6 if b > a else 0.0) for a, b, n in iv]
    W, H = 960, 380
    x0, y0, pw, ph = 70, 60, 850, 250
    tmax = max([b for _, b, _ in iv] + [1.0])
    top = max([v for _, v in pts] + [1.0])
    step = next(s for s in (1, 2, 5, 10, 20, 25, 50, 100, 250, 500, 1000, 10**9) if top / s <= 7)
    ymax = (int(top * 1.15 / step) + 1) * step  # headroom for the labels
    x = lambda t: x0 + t / tmax * pw  # noqa: E731
    y = lambda v: y0 + ph - v / ymax * ph  # noqa: E731
    body = [text(W / 2, 26, data.get("what", "failover"), 15, "middle", ' font-weight="bold"'),
            f'<rect x="{x0}" y="{y0}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>']
    for v in range(0, ymax + 1, step):
        body.append(f'<line x1="{x0}" y1="{num(y(v))}" x2="{x0 + pw}" y2="{num(y(v))}" stroke="#eee"/>')
        body.append(text(x0 - 6, y(v) + 4, str(v), 11, "end"))
    for s in range(0, int(tmax) + 1):
        body.append(text(x(s), y0 + ph + 16, f"{s} s", 11, "middle"))
    body.append(text(18, y0 + ph / 2, "Mbit/s received per 0.1 s", 11, "middle",
                     f' transform="rotate(-90 18 {num(y0 + ph / 2)})"'))
    crash, take = data["crash_s"], data["takeover_s"]
    body.append(f'<rect x="{num(x(crash))}" y="{y0}" width="{num(max(x(take) - x(crash), 1))}" '
                f'height="{ph}" fill="#fed7d7"/>')
    body.append(f'<line class="crash" x1="{num(x(crash))}" y1="{y0}" x2="{num(x(crash))}" y2="{y0 + ph}" '
                f'stroke="#c53030" stroke-width="2"/>')
    body.append(text(x(crash) - 4, y0 + 14, "gw1 crashed", 11, "end", ' fill="#c53030"'))
    body.append(f'<line class="takeover" x1="{num(x(take))}" y1="{y0}" x2="{num(x(take))}" y2="{y0 + ph}" '
                f'stroke="#2f855a" stroke-width="2" stroke-dasharray="5,3"/>')
    body.append(text(x(take) + 4, y0 + 14, f"gw2 holds the VIPs (+{take - crash:.2f} s)", 11, "start",
                     ' fill="#2f855a"'))
    body.append('<polyline fill="none" stroke="#2b6cb0" stroke-width="1.5" points="'
                + " ".join(f"{num(x(t))},{num(y(v))}" for t, v in pts) + '"/>')
    for t, v in pts:
        body.append(f'<circle class="pt" cx="{num(x(t))}" cy="{num(y(v))}" r="2" fill="#2b6cb0"/>')
    body.append(text(x0, H - 16, f"iperf3 server intervals of {data.get('interval_s', 0.1)} s; longest gap after "
                     f"the crash {data.get('longest_gap_s', 0):.1f} s; the crash is placed at the end of the last "
                     "interval reported before it (≤ 0.1 s early).", 11))
    return svg(W, H, body)


# ---------------------------------------------------------------------------------------------

def draw(kind, src, dst):
    with open(src) as f:
        data = json.load(f)
    out = {"ratios": ratios_svg, "failover": failover_svg}[kind](data)
    with open(dst, "w") as f:
        f.write(out)
    return data, out


def selftest():
    """Redraw every committed picture from its committed data into a temporary directory, check
    that each is well-formed XML with one bar per (baseline, metric, setup) or one point per
    interval and the crash/takeover marks, and that it equals the committed SVG byte for byte."""
    ns = "{http://www.w3.org/2000/svg}"
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind, src, committed in COMMITTED:
            dst = os.path.join(tmp, os.path.basename(committed))
            data, out = draw(kind, os.path.join(ROOT, src), dst)
            root = ET.parse(dst).getroot()
            if kind == "ratios":
                bars = [e for e in root.iter(ns + "rect") if e.get("class") == "bar"]
                want = 3 * len(METRICS) * len(SETUPS)
                if len(bars) != want:
                    failed.append(f"{committed}: {len(bars)} bars, want {want}")
                if any(float(b.get("height")) <= 0 for b in bars):
                    failed.append(f"{committed}: a bar of zero height (a missing measurement?)")
            else:
                pts = [e for e in root.iter(ns + "circle") if e.get("class") == "pt"]
                if len(pts) != len(data["intervals"]) or not pts:
                    failed.append(f"{committed}: {len(pts)} points, want {len(data['intervals'])}")
                for mark in ("crash", "takeover"):
                    if not [e for e in root.iter(ns + "line") if e.get("class") == mark]:
                        failed.append(f"{committed}: no {mark} mark")
                if not data["crash_s"] <= data["takeover_s"]:
                    failed.append(f"{committed}: takeover before the crash")
            with open(os.path.join(ROOT, committed)) as f:
                if f.read() != out:
                    failed.append(f"{committed} is not what {src} draws: python3 tests/plot.py {kind} {src} "
                                  f"{committed}")
    # The checks above must be able to fail: a picture with a bar missing is refused.
    broken = ratios_svg(json.load(open(os.path.join(ROOT, COMMITTED[0][1])))).replace('class="bar"', 'class="x"', 1)
    if len([e for e in ET.fromstring(broken).iter(ns + "rect") if e.get("class") == "bar"]) == 3 * len(METRICS) * len(SETUPS):
        failed.append("selftest cannot see a missing bar")
    for f in failed:
        print("FAIL", f)
    print("selftest:", "failed" if failed else f"ok ({len(COMMITTED)} pictures)")
    return 1 if failed else 0


def main(argv):
    if len(argv) == 2 and argv[1] == "selftest":
        return selftest()
    if len(argv) == 4 and argv[1] in ("ratios", "failover"):
        draw(argv[1], argv[2], argv[3])
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
