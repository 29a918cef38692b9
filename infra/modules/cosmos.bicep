// Castiel's shard store: account, database `castiel` and container `shards`, partitioned by
// tenant. Time to live is on with no default, so only documents that carry their own `ttl`
// (sync history records, after the tenant's retention) expire. The app reaches it through
// Entra only; it cannot create databases or containers, which is why they are made here.

param env string
param location string
param tags object
@description('The app identity\'s principal id.')
param principalId string
param serverless bool

resource account 'Microsoft.DocumentDB/databaseAccounts@2024-05-15' = {
  name: 'cosmos-sync-${env}'
  location: location
  tags: tags
  kind: 'GlobalDocumentDB'
  properties: {
    databaseAccountOfferType: 'Standard'
    locations: [
      {
        locationName: location
        failoverPriority: 0
      }
    ]
    consistencyPolicy: {
      defaultConsistencyLevel: 'Session'
    }
    capabilities: serverless ? [
      {
        name: 'EnableServerless'
      }
    ] : []
    // Keys are never used: data-plane access is by role.
    disableLocalAuth: true
    minimalTlsVersion: 'Tls12'
  }
}

resource database 'Microsoft.DocumentDB/databaseAccounts/sqlDatabases@2024-05-15' = {
  parent: account
  name: 'castiel'
  properties: {
    resource: {
      id: 'castiel'
    }
  }
}

resource container 'Microsoft.DocumentDB/databaseAccounts/sqlDatabases/containers@2024-05-15' = {
  parent: database
  name: 'shards'
  properties: {
    resource: {
      id: 'shards'
      partitionKey: {
        paths: [
          '/tenantId'
        ]
        kind: 'Hash'
      }
      defaultTtl: -1
    }
    options: serverless ? {} : {
      autoscaleSettings: {
        maxThroughput: 4000
      }
    }
  }
}

// roles: the handler reads, queries and writes shards (Cosmos DB Built-in Data Contributor, a
// data-plane SQL role, not an Azure RBAC role).
resource dataContributor 'Microsoft.DocumentDB/databaseAccounts/sqlRoleAssignments@2024-05-15' = {
  parent: account
  name: guid(account.id, principalId, '00000000-0000-0000-0000-000000000002')
  properties: {
    roleDefinitionId: '${account.id}/sqlRoleDefinitions/00000000-0000-0000-0000-000000000002'
    principalId: principalId
    scope: account.id
  }
}

output endpoint string = account.properties.documentEndpoint
output database string = database.name
output container string = container.name
