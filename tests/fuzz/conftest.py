"""The fuzz harness runs by hand for a set time (see fuzz_read.py); nothing here is a pytest test."""

collect_ignore_glob = ["*.py"]
