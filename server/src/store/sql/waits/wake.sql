-- Ends the wait of suspended run ($1, $2) now, whatever it waits for (see `aiki_end_wait`, the
-- migration `transitions`): the step it waited at recorded with output $3, a `run_woken` event
-- with details $4. Used by WakeRun, by a delivered event and by a wait whose event or child had
-- already come. Answers nothing if the run is not suspended.
SELECT * FROM aiki_end_wait($1, $2, $3::jsonb, $4::jsonb)
