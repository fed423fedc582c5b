from moetron.model.transformer import Transformer

__all__ = ["Transformer"]
