"""attribution: In-Run Data Shapley for language models.

Data flows one way: corpus -> tokens/batches -> engine -> value store -> analysis -> report.
"""

__version__ = "0.1.0"
