-- The scores database (<lake>/scores.duckdb). Sections are named "-- name: <name>" and run one
-- at a time with bound parameters; ops/scoring/scores.py wraps the writes in one transaction.

-- name: create_tables
CREATE TABLE IF NOT EXISTS topics (
    topic VARCHAR NOT NULL,
    dataset VARCHAR NOT NULL,
    model VARCHAR,
    sae VARCHAR,
    hook VARCHAR,
    summary VARCHAR,
    d_sae BIGINT,
    embedder VARCHAR,
    n_align BIGINT,
    n_prompts BIGINT,
    n_scored BIGINT,
    distance_power DOUBLE,
    min_support BIGINT,
    created TIMESTAMP,
    align_source VARCHAR
);
CREATE TABLE IF NOT EXISTS scores (
    topic VARCHAR NOT NULL,
    dataset VARCHAR NOT NULL,
    sae VARCHAR NOT NULL,
    latent INTEGER NOT NULL,
    g DOUBLE,
    support BIGINT,
    score DOUBLE
);
CREATE TABLE IF NOT EXISTS align_texts (
    topic VARCHAR NOT NULL,
    dataset VARCHAR NOT NULL,
    position INTEGER NOT NULL,
    text VARCHAR NOT NULL
);

-- name: topic_exists
SELECT count(*) FROM topics WHERE topic = $topic AND dataset = $dataset;

-- name: delete_topic_rows
DELETE FROM topics WHERE topic = $topic AND dataset = $dataset;

-- name: delete_score_rows
DELETE FROM scores WHERE topic = $topic AND dataset = $dataset;

-- name: delete_align_rows
DELETE FROM align_texts WHERE topic = $topic AND dataset = $dataset;

-- name: insert_topic
INSERT INTO topics BY NAME SELECT
    $topic AS topic, $dataset AS dataset, $model AS model, $sae AS sae, $hook AS hook, $summary AS summary,
    $d_sae AS d_sae, $embedder AS embedder, $n_align AS n_align, $n_prompts AS n_prompts, $n_scored AS n_scored,
    $distance_power AS distance_power, $min_support AS min_support, now()::TIMESTAMP AS created,
    $align_source AS align_source;

-- name: insert_scores
INSERT INTO scores BY NAME
SELECT $topic AS topic, $dataset AS dataset, $sae AS sae, latent, g, support, score FROM new_scores;

-- name: insert_align_texts
INSERT INTO align_texts BY NAME
SELECT $topic AS topic, $dataset AS dataset, position, text FROM new_align_texts;

-- name: topic_row
SELECT * FROM topics WHERE topic = $topic AND dataset = $dataset;

-- name: align_texts
SELECT text FROM align_texts WHERE topic = $topic AND dataset = $dataset ORDER BY position;
