"""gunicorn settings shared by `make run` and the Docker image (gunicorn reads ./gunicorn.conf.py).

The access log names the path without its query string, and no referrer: query strings hold
what users typed (History's prompt search) and, from a misbehaving client, perhaps an API token
(the API refuses tokens in URLs, but the request line would still be logged). What remains is
enough to follow traffic: client, time, method, path, status, size, duration, user agent.
"""

access_log_format = '%(h)s %(t)s "%(m)s %(U)s %(H)s" %(s)s %(B)s %(M)sms "%(a)s"'
