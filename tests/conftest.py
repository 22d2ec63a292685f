"""Shared pytest configuration."""


def pytest_configure(config):
    config.addinivalue_line("markers", "multiprocess: spawns several processes (a gloo process group on the CPU)")
    config.addinivalue_line("markers", "slow: a long end-to-end or multi-process check, run by `bash scripts/test-slow.sh` "
                                       "(CI runs it after the README's test command)")
