"""A connector that does nothing, in role ec_both: the floor vLLM's connector plumbing costs."""

from vllm.distributed.ec_transfer.ec_connector.base import ECConnectorBase, ECConnectorMetadata


class NoopConnector(ECConnectorBase):
    def start_load_caches(self, encoder_cache, **kwargs):
        pass

    def save_caches(self, encoder_cache, mm_hash, **kwargs):
        pass

    def has_cache_item(self, identifier):
        return False

    def update_state_after_alloc(self, request, index):
        pass

    def build_connector_meta(self, scheduler_output):
        return ECConnectorMetadata()
