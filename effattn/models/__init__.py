"""Assembled transformers (encoder, decoder, encoder-decoder) whose attention is any registered kernel.

    from effattn.models import Decoder
    lm = Decoder(vocab=97, rng=np.random.default_rng(0), attention="local", attn_config={"block": 8},
                 d_model=32, heads=2, layers=2, max_len=64)
    loss, correct, count = lm.loss_and_backward({"x": ids, "y": targets})
"""
from .transformer import IGNORE, MODES, Block, Decoder, Encoder, EncoderDecoder, Model, Stack

__all__ = ["IGNORE", "MODES", "Block", "Decoder", "Encoder", "EncoderDecoder", "Model", "Stack"]
