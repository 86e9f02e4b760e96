-- KEYS: line, owner, keyof, keyblock   ARGV: job_id, wake channel, keyed (1/0)
-- A waiting job gives up its place; if it was the head, the next is woken.
line_leave({line = KEYS[1], owner = KEYS[2], keyof = KEYS[3], blocks = KEYS[4], keyed = ARGV[3] == '1',
            wake = ARGV[2]}, ARGV[1], now_ms())
return 1
