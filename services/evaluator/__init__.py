"""The evaluator: turns the results topic (every outcome, every candidate) and the feedback
topic (the ground truth, minutes or days later) into the evaluation report of issue 11.

`stats` holds the pure statistics (mergeable latency quantiles, the paired bootstrap,
Spearman's rank correlation, PSI drift, error measures); `join` pairs outcomes with their
feedback in bounded memory and yields per-model paired errors. Neither needs a broker.
"""
