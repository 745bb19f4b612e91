"""Everything specific to XLA:CPU, chosen only for programs whose target
platform is `'cpu'`: convolution lowerings and their thresholds (`conv`)
and the fusion barrier (`fusion`). The models describe what is computed;
these modules, how XLA:CPU computes it fastest (docs/benchmarks.md)."""
