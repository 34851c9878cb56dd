"""Stub of modules/sd_hijack.py (WebUI v1.10.1): the comment channel and the embedding database of
``model_hijack``.

processing.process_images_inner copies ``model_hijack.comments`` into ``p.comment()`` after
extra networks are activated.  The prompt tokenizer (sd_hijack_clip) looks textual-inversion
names up in ``model_hijack.embedding_db.ids_lookup``: first token id -> [(ids, embedding)].
"""


class EmbeddingDatabase:   # modules.textual_inversion.textual_inversion.EmbeddingDatabase, lookup and registration
    def __init__(self):
        self.ids_lookup = {}
        self.word_embeddings = {}
        self.skipped_embeddings = {}
        self.expected_shape = -1

    def register_embedding(self, embedding, model):
        return self.register_embedding_by_name(embedding, model, embedding.name)

    def register_embedding_by_name(self, embedding, model, name):
        """v1.10.1's semantics: ``name``'s entry replaced by ``embedding``, or removed when it is None."""
        ids = model.cond_stage_model.tokenize([name])[0]
        rest = [x for x in self.ids_lookup.get(ids[0], []) if x[1].name != name]
        if embedding is not None:
            rest.append((ids, embedding))
            self.word_embeddings[name] = embedding
        else:
            self.word_embeddings.pop(name, None)
        if rest:
            self.ids_lookup[ids[0]] = sorted(rest, key=lambda x: len(x[0]), reverse=True)
        else:
            self.ids_lookup.pop(ids[0], None)
        return embedding

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
