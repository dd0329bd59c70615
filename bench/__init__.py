"""Benchmarks of the POP agent with real parts: `python -m bench [failover|throughput|announce|all]`.

Not part of `make test`: they take minutes, need root (network namespaces, FRR, ExaBGP)
and their numbers only mean something on a quiet machine. See bench/README.md.
"""
