-- Plans come from statistics: refresh them after 2% of the rows changed instead of the default
-- 10%, so a quickly growing relay is not planned for long as if it were still nearly empty.
ALTER TABLE events SET (autovacuum_analyze_scale_factor = 0.02);
ALTER TABLE tags SET (autovacuum_analyze_scale_factor = 0.02);
