"""Show, Attend and Tell (Xu et al., 2015) on ssl_fast encoders and the fused additive attention.

* :mod:`.scenes`: the embedded data set (digit scenes with captions and true boxes);
* :mod:`.karpathy`: the Karpathy-split JSON of COCO, Flickr8k and Flickr30k with an image folder;
* :mod:`.data`: :class:`CaptionSet` and :class:`Vocabulary`;
* :mod:`.encoder`: any ssl_fast backbone's feature map, frozen or fine-tuned from a stage, or the
  backbone of an ``ssl-fast pretrain`` checkpoint;
* :mod:`.model`: the attention LSTM decoder, the doubly stochastic regulariser, the captioner;
* :mod:`.search`: greedy decoding and beam search, with each word's attention;
* :mod:`.metrics`: BLEU-1..4 (NLTK) and attention localisation;
* :mod:`.figures`: per-word attention figures;
* :mod:`.task` and :mod:`.cli`: training with exact resume, logs, and ``ssl-fast caption``.
"""
from ssl_fast.tasks.captioning.data import CaptionSet, Vocabulary
from ssl_fast.tasks.captioning.encoder import Encoder, load_pretrained_backbone
from ssl_fast.tasks.captioning.karpathy import load_karpathy
from ssl_fast.tasks.captioning.metrics import corpus_bleu, localisation
from ssl_fast.tasks.captioning.model import Captioner, Decoder, doubly_stochastic
from ssl_fast.tasks.captioning.scenes import load_scenes, make_scenes
from ssl_fast.tasks.captioning.search import beam_search, greedy
from ssl_fast.tasks.captioning.task import CaptionConfig, CaptionTask

__all__ = ["CaptionConfig", "CaptionSet", "CaptionTask", "Captioner", "Decoder", "Encoder", "Vocabulary",
           "beam_search", "corpus_bleu", "doubly_stochastic", "greedy", "load_karpathy", "load_pretrained_backbone",
           "load_scenes", "localisation", "make_scenes"]
