"""SQL migrations applied by `polystream migrate`; shipped inside the wheel."""
