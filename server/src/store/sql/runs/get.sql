SELECT * FROM runs WHERE namespace = $1 AND id = $2
