"""The admin console in the browser: server-rendered pages on their own listen address.

`auth` owns users, passwords, sessions, CSRF tokens and login throttling; `approvals` the
four-eyes requests; `querysearch` reading the query log; `app` the pages and the HTTP server
that `blocker serve` starts when `console.enabled` is true.
"""
