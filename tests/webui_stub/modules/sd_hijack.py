"""Stub of modules/sd_hijack.py (WebUI v1.10.1): the comment channel and the embedding database of
``model_hijack``.

processing.process_images_inner copies ``model_hijack.comments`` into ``p.comment()`` after
extra networks are activated.  The prompt tokenizer (sd_hijack_clip) looks textual-inversion
names up in ``model_hijack.embedding_db.ids_lookup``: first token id -> [(ids, embedding)].
"""


class EmbeddingDatabase:   # modules.textual_inversion.textual_inversion.EmbeddingDatabase, lookup part
    def __init__(self):
        self.ids_lookup = {}
        self.word_embeddings = {}

    def find_embedding_at_position(self, tokens, offset):
        for ids, embedding in self.ids_lookup.get(tokens[offset], []):
            if tokens[offset:offset + len(ids)] == ids:
                return embedding, len(ids)
        return None, None


class StableDiffusionModelHijack:
    def __init__(self):
        self.extra_generation_params = {}
        self.comments = []
        self.embedding_db = EmbeddingDatabase()

    def clear_comments(self):
        self.comments = []
        self.extra_generation_params = {}


model_hijack = StableDiffusionModelHijack()
