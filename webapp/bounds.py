"""What a request may hold, said once: the API schemas, the services' checks and the columns use these."""

# The API's ceiling for a prompt; PROMPT_MAX_CHARS may lower it, not raise it.
PROMPT_CEILING = 32_000
SYSTEM_MAX_CHARS = 8_000
# A model's name, as the catalog, a submission and a filter give it (the tasks.model column).
MODEL_NAME_MAX = 100
# An Idempotency-Key header (the idempotency_keys.key column).
IDEMPOTENCY_KEY_MAX = 255
PRIORITY_MIN, PRIORITY_DEFAULT, PRIORITY_MAX = 1, 5, 10
# Tasks per page: the API's ?limit= and History.
LIST_MAX = 100
SEARCH_MAX_CHARS = 200
