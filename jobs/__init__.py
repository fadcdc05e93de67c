"""What workers run. Jobs execute inside the worker's app context (see `flask worker`)."""
