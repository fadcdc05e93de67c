"""Business rules, called by both the pages and the API; they raise domain errors, never HTTP ones."""
