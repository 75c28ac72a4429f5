//! Datapath shell: NFQUEUE workers, verdicts, and the iptables rules that feed the queues.
