"""Media processing for the worker's video jobs.

- `io`: probing, decoding and encoding with PyAV (bad inputs → PermanentError)
- `pipeline`: the bounded decode → compute → encode thread pipeline
- `device`: uint8 staging to the compute device (pinned, non-blocking on CUDA)
- `locate`, `matte`, `restore`: find a mark, estimate its matte, undo it
- `fill`: harmonic / biharmonic fills of a fixed mask, factored once per job
- `overlay`: overlay removal built from the above (one decode in template
  mode, analyse + restore passes otherwise)
- `synth`: synthetic clips with a known mark (quality tests and benchmarks)
"""
