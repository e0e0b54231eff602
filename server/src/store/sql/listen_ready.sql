LISTEN aiki_ready
