"""`wspo study`: reward-vs-KL frontiers of every method on one fluent preference dataset, tuned alike."""
