"""Who may use a server and what they did: users, collections and sessions (users.py) and
the hash-chained audit log (audit.py). Shared by `falconet serve` and the CLI's `users`,
`collections` and `audit` commands; no web code here."""
