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

STORAGE_WRITE = """
mutation StorageWrite($runId: String!, $location: String!, $writes: [StorageCallInput!]!) {
  storageWrite(runId: $runId, location: $location, writes: $writes) { accepted duplicates refused { index error } }
}"""

STORAGE_CALL = """
mutation StorageCall($runId: String!, $location: String!, $call: StorageCallInput!) {
  storageCall(runId: $runId, location: $location, call: $call) { result error }
}"""

ROTATE_KEY = """
mutation RotateKey($publicKey: String!, $proof: String!) {
  rotateAgentKey(publicKey: $publicKey, proof: $proof) { agentId keyId previousKeyId previousKeyValidUntil }
}"""

ALL = {"Enroll": ENROLL, "WhoAmI": WHOAMI, "ClaimWork": CLAIM_WORK, "PostResults": POST_RESULTS,
       "Heartbeat": HEARTBEAT, "StorageWrite": STORAGE_WRITE, "StorageCall": STORAGE_CALL,
       "RotateKey": ROTATE_KEY}
