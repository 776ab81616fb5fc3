"""What ops are: the op-kind table (kinds), the attention helper op, the quantized module twins."""
