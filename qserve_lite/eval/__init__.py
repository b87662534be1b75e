"""eval: perplexity with the GPTQ / QServe protocol over the reference model, and the text corpora
(python3.11-doc) it and calibration read.
"""
