"""Resources: where orders come from (a fixed feed here; a database in production)."""

import dagster as dg


class OrderFeed(dg.ConfigurableResource):
    region: str = "eu"

    def fetch(self) -> list[dict]:
        return [{"id": i, "region": self.region, "amount": 125_000 * i} for i in range(1, 9)]
