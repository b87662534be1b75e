"""quant: the offline QoQ quantizer (qoq.quantize_model): calibration statistics (calibrate), rotation
(rotate),
SmoothAttention and down_proj smoothing, channel reordering, clipping, GPTQ, the weight quantizers; it writes
QServe-layout checkpoints through io.checkpoint.
"""
