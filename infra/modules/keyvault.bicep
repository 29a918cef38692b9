// Credentials: one secret per integration (`int-<tenant>--<integration>`), which the handler
// reads and rewrites when it refreshes a token. RBAC only, no access policies. Also the one
// secret the platform needs: the content share's connection string, referenced by the app
// setting instead of being copied into it.

param env string
param location string
param tags object
@description('The app identity\'s principal id.')
param principalId string
@description('The Functions host\'s storage account, whose content share needs a key.')
param storageAccountName string

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' = {
  // Vault names are 3-24 characters and global.
  name: 'kv-sync-${env}-${take(uniqueString(resourceGroup().id), 8)}'
  location: location
  tags: tags
  properties: {
    tenantId: subscription().tenantId
    sku: {
      family: 'A'
      name: 'standard'
    }
    enableRbacAuthorization: true
    enableSoftDelete: true
    softDeleteRetentionInDays: 90
    // Purge protection cannot be turned off again; production keeps deleted secrets for good.
    enablePurgeProtection: env == 'prod' ? true : null
  }
}

resource storage 'Microsoft.Storage/storageAccounts@2023-01-01' existing = {
  name: storageAccountName
}

resource contentShare 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = {
  parent: vault
  name: 'content-share-connection'
  properties: {
    value: 'DefaultEndpointsProtocol=https;AccountName=${storage.name};EndpointSuffix=${environment().suffixes.storage};AccountKey=${storage.listKeys().keys[0].value}'
  }
}

// roles: the handler reads credentials and stores refreshed tokens and subscription secrets
// (Key Vault Secrets Officer: get, list, set, delete secrets; no keys, no certificates).
resource secretsOfficer 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(vault.id, principalId, 'b86a8fe4-44ce-4948-aee5-eccb2c155cd7')
  scope: vault
  properties: {
    // Key Vault Secrets Officer
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', 'b86a8fe4-44ce-4948-aee5-eccb2c155cd7')
    principalId: principalId
    principalType: 'ServicePrincipal'
  }
}

output uri string = vault.properties.vaultUri
output contentShareSecretUri string = contentShare.properties.secretUri
