"""Everything specific to XLA:CPU, chosen only for programs whose target
platform is `'cpu'`: convolution lowerings and their thresholds (`conv`),
the fusion barrier (`fusion`) and DenseNet's scanned dense layers
(`dense_scan`). The models describe what is computed; these modules, how
XLA:CPU computes it fastest (docs/benchmarks.md)."""
