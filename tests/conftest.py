"""Shared pytest configuration."""


def pytest_configure(config):
    config.addinivalue_line("markers", "multiprocess: spawns several processes (a gloo process group on the CPU)")
