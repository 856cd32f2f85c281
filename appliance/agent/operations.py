"""Every GraphQL operation the agent sends. tests/contract validates each against protocol/schema.graphql."""

ENROLL = """
mutation Enroll($token: String!, $publicKey: String!, $labels: [String!]!) {
  enrollAgent(token: $token, publicKey: $publicKey, labels: $labels) {
    agentId deployment controlPlaneKey controlPlaneKeyId
  }
}"""

WHOAMI = """
query WhoAmI { agent { id deployment keyId labels } }"""

CLAIM_WORK = """
mutation ClaimWork($queues: [String!]!, $waitSeconds: Int, $limit: Int) {
  claimWork(queues: $queues, waitSeconds: $waitSeconds, limit: $limit) {
    id kind queue payload attempt signature signedBy
  }
}"""

POST_RESULTS = """
mutation PostResults($results: [WorkResultInput!]!) { postResults(results: $results) }"""

HEARTBEAT = """
mutation Heartbeat($input: HeartbeatInput!) { heartbeat(input: $input) }"""

ALL = {"Enroll": ENROLL, "WhoAmI": WHOAMI, "ClaimWork": CLAIM_WORK, "PostResults": POST_RESULTS,
       "Heartbeat": HEARTBEAT}
