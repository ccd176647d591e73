"""`deer-serve bench`: DEER against plain decoding and its peers, in one interleaved run.

cli.py (flags, the interleaved loop), suites.py (prompts), methods.py (one class per method),
service.py (the Ray Serve methods), stats.py (the numbers), report.py (Markdown + PNG plots).
"""
