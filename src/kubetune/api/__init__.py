"""``kubetune api``: OpenAI's files and fine-tuning endpoints, backed by FineTuneJobs.

An OpenAI fine-tuning script works against it with only ``base_url`` and ``api_key`` changed: the key
is a Kubernetes bearer token, the OpenAI project is the namespace.
"""
