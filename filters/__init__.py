"""Example filter files shipped with polystream; copied by `polystream filter add`."""
