//! keepstate-tests: the network-namespace lab used by the end-to-end tests and the datapath benchmark.
