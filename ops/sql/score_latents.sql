-- Per-latent topic scores for one lake dataset (docs/algorithms.md §2, paper A eq. 1-2).
--
-- Relations and parameters:
--   read_parquet($activations)   one dataset's activation files: prompt_id BIGINT, latent INTEGER,
--                                value FLOAT (one row per prompt and firing latent, value = s(p)_i)
--   distances                    a registered Arrow table: prompt_id BIGINT, d DOUBLE, the minimum
--                                Euclidean distance of each reference prompt to P_align
--   $power                       DOUBLE, the distance power (1 = paper text, 2 = paper code)
--   $min_support                 BIGINT, latents firing on fewer prompts get a NULL score
--
-- g_i       = sum_p s(p)_i * d(p)^power / sum_p s(p)_i over the prompts where latent i fires
-- support_i = number of prompts with s(p)_i > 0
-- score_i   = (max g - g_i) / (max g - min g) over the latents with support >= $min_support;
--             when max g and min g agree (to 1e-9 relative) every scored latent gets 1.0.
-- Prompts of the activations without a distance (no embedding) do not count.
WITH dist AS (
    SELECT prompt_id, pow(min(d), $power) AS w
    FROM distances
    GROUP BY prompt_id
),
per_latent AS (
    SELECT a.latent,
           sum(a.value::DOUBLE * dist.w) / sum(a.value::DOUBLE) AS g,
           count(*) AS support
    FROM read_parquet($activations, hive_partitioning = false) AS a
    JOIN dist USING (prompt_id)
    WHERE a.value > 0
    GROUP BY a.latent
),
bounds AS (
    SELECT max(g) AS g_max, min(g) AS g_min
    FROM per_latent
    WHERE support >= $min_support
)
SELECT p.latent::INTEGER AS latent,
       p.g,
       p.support::BIGINT AS support,
       CASE
           WHEN p.support < $min_support THEN NULL
           WHEN b.g_max - b.g_min <= 1e-9 * b.g_max THEN 1.0
           ELSE (b.g_max - p.g) / (b.g_max - b.g_min)
       END::DOUBLE AS score
FROM per_latent AS p
CROSS JOIN bounds AS b
ORDER BY p.latent
