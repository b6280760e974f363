"""Speed paths and the checks that guard them (the parity gate)."""
