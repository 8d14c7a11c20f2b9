-- Related-note pairs from view→click co-occurrence: the scoring and selection of
-- components/mine_pairs/run.py (mine_pairs) as one SQL query, for a warehouse engine at billions
-- of events. Tested on DuckDB against the Python engine (tests/components/test_mine_pairs.py);
-- written in the SQL that BigQuery and Spark SQL share (window functions partitioned by user,
-- LEAST/GREATEST, COUNT(DISTINCT), a join on user with a range condition, 1E0 as a DOUBLE/FLOAT64
-- literal). One construct needs translating for BigQuery: the ordered-set aggregate
-- PERCENTILE_CONT(q) WITHIN GROUP (ORDER BY score) in `bounds` (standard SQL; DuckDB, Spark 3.3+,
-- PostgreSQL) is there PERCENTILE_CONT(score, q) OVER () on the rows of `supported`, taken once.
-- Render it with run.warehouse_sql(cfg), which fills the {placeholders} below.
--
-- Input {events}: user_id, note_id (strings), event ('view' | 'click'), t (BIGINT microseconds
-- since the epoch: DuckDB epoch_us(ts), BigQuery UNIX_MICROS(ts), Spark unix_micros(ts)).
-- Output: query_id, target_id, score, sorted by (query_id, target_id).
--
-- s(A→B) = Σ_u c_u(A→B) / N_u; c_u counts u's clicks on B with a view of A (A ≠ B) in
-- [t_click - window, t_click]; N_u counts all of u's clicks. The range join is partitioned on
-- user_id (a hash/shuffle join with a range residual), so the work is linear in events times
-- views per window, and no user's events need to fit one worker beyond that user's.
WITH e AS (
  SELECT user_id, note_id, event = 'click' AS click, t FROM {events}
),
clicks AS (  -- each click event its own id within its user: repeated clicks count again
  -- (numbered per user, so no engine has to sort all clicks on one worker)
  SELECT ROW_NUMBER() OVER (PARTITION BY user_id ORDER BY t, note_id) AS cid, user_id,
         note_id AS b, t
  FROM e WHERE click
),
n_u AS (
  SELECT user_id, COUNT(*) AS n FROM clicks GROUP BY user_id
),
matches AS (  -- one row per (click, viewed note): several views of A in one window count once
  SELECT DISTINCT c.cid, c.user_id, v.note_id AS a, c.b
  FROM clicks c JOIN e v
    ON v.user_id = c.user_id AND NOT v.click
   AND v.t >= c.t - {window_us} AND v.t <= c.t
  WHERE v.note_id <> c.b
),
scored AS (  -- symmetric: {A, B} scores s(A→B) + s(B→A), written once with query < target
  SELECT CASE WHEN {symmetric} THEN LEAST(m.a, m.b) ELSE m.a END AS q,
         CASE WHEN {symmetric} THEN GREATEST(m.a, m.b) ELSE m.b END AS p,
         SUM(1E0 / n.n) AS score,
         COUNT(DISTINCT m.user_id) AS users
  FROM matches m JOIN n_u n ON n.user_id = m.user_id
  GROUP BY 1, 2
),
coverage AS (  -- mine.min_users applies only if it leaves a pair to enough of the notes
  SELECT COUNT(DISTINCT CASE WHEN users >= {min_users} THEN note END) AS kept,
         COUNT(DISTINCT note) AS total
  FROM (SELECT q AS note, users FROM scored UNION ALL SELECT p AS note, users FROM scored) x
),
supported AS (
  SELECT s.* FROM scored s CROSS JOIN coverage c
  WHERE s.users >= {min_users} OR c.kept < {min_users_coverage} * c.total
),
bounds AS (  -- linear-interpolated quantiles, as numpy's
  SELECT PERCENTILE_CONT({min_score_quantile}) WITHIN GROUP (ORDER BY score) AS lo,
         PERCENTILE_CONT({max_score_quantile}) WITHIN GROUP (ORDER BY score) AS hi
  FROM supported
),
inside AS (
  SELECT s.q, s.p, s.score FROM supported s CROSS JOIN bounds b
  WHERE ({min_score_quantile} <= 0.0 AND {max_score_quantile} >= 1.0)
     OR (s.score >= b.lo AND s.score <= b.hi)
),
ends AS (  -- each pair ranked from its query note, and (symmetric) from its target note too
  SELECT q, p, score, q AS note, p AS partner FROM inside
  UNION ALL
  SELECT q, p, score, p AS note, q AS partner FROM inside WHERE {symmetric}
),
ranked AS (  -- ties broken by the partner id, ascending
  SELECT q, p, score,
         ROW_NUMBER() OVER (PARTITION BY note ORDER BY score DESC, partner ASC) AS r
  FROM ends
)
SELECT q AS query_id, p AS target_id, MAX(score) AS score
FROM ranked WHERE r <= {top_k}
GROUP BY q, p
ORDER BY query_id, target_id
