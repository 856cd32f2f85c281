"""Parse (and validate) each distinct GraphQL document once. Agents send a handful of fixed operations,
so re-parsing them on every long poll was measured at 1-2 ms per request for nothing."""

from __future__ import annotations

from functools import lru_cache

from graphql import DocumentNode, GraphQLError, GraphQLSchema, parse, validate

MAX_TOKENS = 5000


@lru_cache(maxsize=512)
def parse_cached(query: str) -> DocumentNode:
    """Raises GraphQLError on a syntax error (not cached: lru_cache keeps only results)."""
    return parse(query, max_tokens=MAX_TOKENS)


class Validator:
    """Validation results per document for one schema."""

    def __init__(self, schema: GraphQLSchema) -> None:
        self.schema = schema
        self._validate = lru_cache(maxsize=512)(self._run)

    def _run(self, query: str) -> tuple[GraphQLError, ...]:
        return tuple(validate(self.schema, parse_cached(query)))

    def errors(self, query: str) -> tuple[GraphQLError, ...]:
        return self._validate(query)
