SELECT pg_notify('aiki_ready', $1)
