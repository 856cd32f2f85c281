"""The gateway's GraphQL schema: exactly protocol/schema.graphql (schema-first), bound to the resolvers."""

from __future__ import annotations

from pathlib import Path

from ariadne import MutationType, QueryType, load_schema_from_path, make_executable_schema
from graphql import GraphQLSchema

SDL_PATH = Path(__file__).resolve().parents[2] / "protocol" / "schema.graphql"


def load_sdl() -> str:
    """The SDL text; ariadne raises GraphQLFileSyntaxError naming the file if it is broken."""
    return load_schema_from_path(str(SDL_PATH))


def build_schema(query: QueryType, mutation: MutationType) -> GraphQLSchema:
    return make_executable_schema(load_sdl(), query, mutation, convert_names_case=False)
