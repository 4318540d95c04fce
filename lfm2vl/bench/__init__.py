"""`lfm2vl bench`: the announcement's speed workload (one 1024x1024 image, "Describe this image in
detail.", exactly 100 new tokens, batch 1), our engine against transformers, each in its own process
(docs/performance.md). command.py (flags, report) -> side.py (one measured process) -> ours.py /
reference.py; workload.py holds what both sides share.
"""
