"""Media processing for the worker's video jobs.

- `io`: probing, decoding and encoding with PyAV (bad inputs → PermanentError)
- `pipeline`: the bounded decode → compute → encode thread pipeline
- `device`: uint8 staging to the compute device (pinned, non-blocking on CUDA)
- `locate`, `matte`, `restore`: find a mark, estimate its matte, undo it
- `overlay`: the two-pass overlay removal built from the above
- `synth`: synthetic clips with a known mark (quality tests and benchmarks)
"""
