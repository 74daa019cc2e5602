from .llada import LLaDAConfig, LLaDAModelLM

__all__ = ["LLaDAConfig", "LLaDAModelLM"]
