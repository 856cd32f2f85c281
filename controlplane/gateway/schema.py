"""The gateway's GraphQL schema: exactly protocol/schema.graphql (schema-first, graphql-core), bound to
resolvers by name. Binding checks that every resolver names a field the SDL has, and the reverse."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import graphql

from protocol.errors import PermanentError

SDL_PATH = Path(__file__).resolve().parents[2] / "protocol" / "schema.graphql"
Resolvers = dict[str, dict[str, Callable[..., Any]]]  # {"Query": {"agent": fn}, "Mutation": {...}}


class SchemaFileError(PermanentError):
    """protocol/schema.graphql does not parse, or resolvers and SDL disagree; names the file."""


def load_sdl() -> str:
    return SDL_PATH.read_text()


def build_schema(resolvers: Resolvers) -> graphql.GraphQLSchema:
    try:
        schema = graphql.build_schema(load_sdl())
    except graphql.GraphQLError as exc:
        raise SchemaFileError(f"{SDL_PATH}: {exc.message}") from None
    for type_name, fields in resolvers.items():
        object_type = schema.get_type(type_name)
        if not isinstance(object_type, graphql.GraphQLObjectType):
            raise SchemaFileError(f"{SDL_PATH}: no object type {type_name!r} for resolvers")
        missing_in_sdl = set(fields) - set(object_type.fields)
        unresolved = set(object_type.fields) - set(fields)
        if missing_in_sdl or unresolved:
            raise SchemaFileError(f"{SDL_PATH}: {type_name} fields without SDL {sorted(missing_in_sdl)}, "
                                  f"SDL fields without resolver {sorted(unresolved)}")
        for name, fn in fields.items():
            object_type.fields[name].resolve = fn
    return schema
