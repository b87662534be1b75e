"""bench: `qserve-lite bench`, generation throughput with QServe's protocol on random weights of a real shape
(throughput, measure, protocol, max_batch), decode-step timing (step_split), and the JSON-lines results files
every benchmark script writes (results).
"""
