"""Evaluation: wikitext-2 perplexity, MMLU, GSM8K and HumanEval as a Ray job (`moray eval`).

The tasks (`tasks/`) turn documents into requests as lm-evaluation-harness defines them; the
scorer (`moray.actors.scorer`) answers requests with moray's own model on Ray actors, or a running
deployment answers the generation tasks through its OpenAI API (`endpoint`); `job` fans the
requests out and logs the results to MLflow."""
